"""DoraAnalysisCallback inside a real Trainer run on a tiny LLaMA (CPU): rows equal a separate
analysis of the same checkpoints, TensorBoard holds the dora/ tags, training is unchanged; PEFT
adapters; a base that does not fit; a failed analysis does not stop training."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import dora_analysis as da
from dora_analysis.errors import AnalysisCallbackWarning, ConfigError

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
from dora_analysis.integrations.transformers import DoraAnalysisCallback  # noqa: E402

TAGS = ("delta_m", "delta_d", "pearson_r")


def dataset(n: int = 12, length: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(1000, 3000, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return rows


def run_trainer(model, out, callbacks=(), report_to=("tensorboard",), steps=6, resume=None,
                **options):
    settings = {"save_only_model": True} | options  # no optimizer state unless resumed from
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, save_strategy="steps", save_steps=2,
        logging_steps=1, per_device_train_batch_size=2, learning_rate=5e-3, use_cpu=True,
        seed=0, data_seed=0, report_to=list(report_to), disable_tqdm=True, **settings)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(),
                                   callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in folder.rglob("events.out.tfevents.*"):  # OUTPUT/runs/<date>/
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return found


def same_table(written, separate) -> None:
    keys = ["step", "name", "axis"]
    assert written["run"].nunique() == 1  # the run the rows belong to
    a = written.drop(columns="run").sort_values(keys).reset_index(drop=True)
    b = separate.sort_values(keys).reset_index(drop=True)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for column in a.columns:
        if a[column].dtype.kind == "f":
            assert a[column].to_numpy() == pytest.approx(b[column].to_numpy(), rel=1e-12,
                                                         nan_ok=True), column
        elif column != "ref":  # the same folder, spelled from the run or from the checkpoint
            assert a[column].astype(str).tolist() == b[column].astype(str).tolist(), column


def test_full_fine_tuning_rows_equal_a_separate_analysis_and_tensorboard_has_them(
        tmp_path, tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    run_trainer(model, tmp_path / "run", [DoraAnalysisCallback(modules=("q", "v", "down"))])
    written = da.read_table(tmp_path / "run" / "dora_analysis.parquet")
    assert sorted(set(written["step"])) == [2, 4, 6]
    same_table(written, da.analyze(tiny_llama, tmp_path / "run", modules=("q", "v", "down")))

    tb = scalars(tmp_path / "run")
    for module in ("q", "v", "down"):
        for tag in TAGS:
            steps = [s for s, _ in tb[f"train/dora/{module}/{tag}"]]
            assert steps == ([2, 4, 6] if tag != "pearson_r" else [4, 6]), (module, tag)
    step4 = written[(written["step"] == 4) & (written["module"] == "q")]
    logged = dict(tb["train/dora/q/delta_m"])[4]
    assert logged == pytest.approx(step4["delta_m"].mean(), rel=1e-6)
    upto6 = written[written["module"] == "v"]
    r = upto6["delta_d"].corr(upto6["delta_m"])
    assert dict(tb["train/dora/v/pearson_r"])[6] == pytest.approx(r, rel=1e-5)
    assert any("train/loss" == tag for tag in tb)  # next to the loss


@pytest.mark.slow
def test_training_is_the_same_with_and_without_the_callback(tmp_path, tiny_llama):
    llama = transformers.AutoModelForCausalLM.from_pretrained
    torch.manual_seed(0)
    plain = run_trainer(llama(tiny_llama), tmp_path / "plain")
    torch.manual_seed(0)
    watched = run_trainer(llama(tiny_llama), tmp_path / "run", [DoraAnalysisCallback()])
    assert len(losses(plain)) == 6 and losses(watched) == losses(plain)
    assert (tmp_path / "run" / "dora_analysis.parquet").is_file()
    for step in (2, 4, 6):  # and the saved weights too
        a = load_file(str(tmp_path / "plain" / f"checkpoint-{step}" / "model.safetensors"))
        b = load_file(str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapters_are_analysed_against_their_base(tmp_path, tiny_llama, use_dora):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(tiny_llama),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        use_dora=use_dora))
    run_trainer(model, tmp_path / "run", [DoraAnalysisCallback()])  # base from the adapter
    written = da.read_table(tmp_path / "run" / "dora_analysis.parquet")
    assert set(written["method"]) == {"dora" if use_dora else "lora"}
    assert (tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors").is_file()
    same_table(written, da.analyze(tiny_llama, tmp_path / "run"))
    assert "train/dora/q/pearson_r" in scalars(tmp_path / "run")


@pytest.mark.slow
def test_trl_sft_trainer(tmp_path, tiny_llama):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(
        [{"prompt": f"what is {i} plus {i}?", "completion": f" it is {2 * i}."}
         for i in range(12)])
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2,
                         logging_steps=1, per_device_train_batch_size=2, use_cpu=True,
                         report_to=["tensorboard"], disable_tqdm=True, max_length=32)
    trainer = trl.SFTTrainer(model=str(tiny_llama), args=args, train_dataset=data,
                             callbacks=[DoraAnalysisCallback(modules=("q", "v"))])
    trainer.train()
    written = da.read_table(tmp_path / "run" / "dora_analysis.parquet")
    assert sorted(set(written["step"])) == [2, 4]
    same_table(written, da.analyze(tiny_llama, tmp_path / "run", modules=("q", "v")))
    tb = scalars(tmp_path / "run")
    assert [s for s, _ in tb["train/dora/q/delta_d"]] == [2, 4]
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 4 and all("mean_token_accuracy" in e for e in logged)  # TRL's intact


def test_a_base_that_does_not_fit_stops_before_the_first_step(tmp_path, tiny_llama):
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=120, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1))
    other.save_pretrained(tmp_path / "other")
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ConfigError, match=r"DoraAnalysisCallback: base .*other does not fit the "
                                          r"model being trained: .* differ in shape"):
        run_trainer(model, tmp_path / "run", [DoraAnalysisCallback(base=tmp_path / "other")],
                    report_to=())
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_checkpoint_that_cannot_be_analysed_is_a_warning_and_training_goes_on(
        tmp_path, tiny_llama, monkeypatch):
    callback = DoraAnalysisCallback()

    def broken(folder):
        raise da.DoraAnalysisError("disk trouble")

    monkeypatch.setattr(callback, "analyse", broken)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run_trainer(model, tmp_path / "run", [callback], report_to=(), steps=2)
    messages = [str(w.message) for w in caught if w.category is AnalysisCallbackWarning]
    assert messages == [f"{tmp_path / 'run' / 'checkpoint-2'}: not analysed (DoraAnalysisError: "
                        "disk trouble); training goes on"]
    assert trainer.state.global_step == 2 and not (tmp_path / "run" / "dora_analysis.parquet"
                                                   ).exists()


def test_only_the_main_process_works(tmp_path):
    callback = DoraAnalysisCallback(base="unused")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state = transformers.TrainerState(global_step=2)
    state.is_world_process_zero = False
    callback.on_train_begin(args, state, transformers.TrainerControl(), model=None)
    callback.on_save(args, state, transformers.TrainerControl())
    assert list(tmp_path.iterdir()) == []


def test_settings_are_checked_when_the_callback_is_made():
    with pytest.raises(ConfigError, match="--axis must be one of"):
        DoraAnalysisCallback(axis="rows")
    with pytest.raises(ConfigError, match="output must be a file name ending in"):
        DoraAnalysisCallback(output="runs/table.xlsx")
    assert json.dumps(DoraAnalysisCallback().config.axes) == '["out"]'


def logged(trainer, tag: str) -> dict[int, float]:
    return {e["step"]: e[tag] for e in trainer.state.log_history if tag in e}


def test_a_new_run_in_the_same_folder_starts_a_new_table(tmp_path, tiny_llama):
    """An earlier run's rows are not pooled into this run's Pearson r: its table is moved
    aside (named in a warning) and this run's table holds its own rows only."""
    llama = transformers.AutoModelForCausalLM.from_pretrained
    out = tmp_path / "run"
    run_trainer(llama(tiny_llama), out, [DoraAnalysisCallback(modules=("q", "v"))],
                report_to=(), steps=4)
    first = da.read_table(out / "dora_analysis.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a shorter run: the earlier step 4 would stay behind
        trainer = run_trainer(llama(tiny_llama), out, [DoraAnalysisCallback(modules=("q", "v"))],
                              report_to=(), steps=2)
    second = da.read_table(out / "dora_analysis.parquet")
    assert sorted(set(second["step"])) == [2] and len(second) == len(first) // 2
    (first_run,) = set(first["run"])
    moved = out / f"dora_analysis.{first_run}.parquet"
    messages = [str(w.message) for w in caught if w.category is AnalysisCallbackWarning]
    assert messages == [f"{out / 'dora_analysis.parquet'} held another run's rows (training "
                        f"started anew): moved to {moved.name}; this run starts a new table"]
    assert set(second["run"]) != {first_run} and second["run"].nunique() == 1
    assert da.read_table(moved).equals(first)  # kept aside, unchanged
    # r of this run's rows only: two layers at one step are too few for one (pooled with the
    # earlier run's step 4, there was an r)
    assert "dora/q/delta_m" in trainer.state.log_history[-2]
    assert logged(trainer, "dora/q/pearson_r") == {}


def test_a_resumed_run_keeps_its_rows_up_to_the_resumed_step(tmp_path, tiny_llama):
    llama = transformers.AutoModelForCausalLM.from_pretrained
    out = tmp_path / "run"
    run_trainer(llama(tiny_llama), out, [DoraAnalysisCallback(modules=("q",))], report_to=(),
                steps=4, save_only_model=False)
    before = da.read_table(out / "dora_analysis.parquet")
    assert sorted(set(before["step"])) == [2, 4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # resumed from step 2 and stopped at 3: the old step 4 is another history
        run_trainer(llama(tiny_llama), out, [DoraAnalysisCallback(modules=("q",))],
                    report_to=(), steps=3, resume=str(out / "checkpoint-2"),
                    save_only_model=False)
    assert not [w for w in caught if w.category is AnalysisCallbackWarning]
    after = da.read_table(out / "dora_analysis.parquet")
    assert sorted(set(after["step"])) == [2, 3]
    assert set(after["run"]) == set(before["run"])  # the same run, continued
    kept = after[after["step"] == 2].reset_index(drop=True)
    assert kept.equals(before[before["step"] == 2].reset_index(drop=True))
    assert not list(out.glob("dora_analysis.*.parquet"))


@pytest.mark.slow
def test_a_resume_from_another_runs_checkpoint_starts_a_new_table(tmp_path, tiny_llama):
    """The table in output_dir is run A's; training resumes from run B's checkpoint (saved in
    another folder, without the callback): A's rows are moved aside."""
    llama = transformers.AutoModelForCausalLM.from_pretrained
    out = tmp_path / "run"
    run_trainer(llama(tiny_llama), out, [DoraAnalysisCallback(modules=("q",))], report_to=(),
                steps=2)
    run_trainer(llama(tiny_llama), tmp_path / "other", report_to=(), steps=4,
                save_only_model=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_trainer(llama(tiny_llama), out, [DoraAnalysisCallback(modules=("q",))],
                    report_to=(), steps=6, resume=str(tmp_path / "other" / "checkpoint-4"),
                    save_only_model=False, restore_callback_states_from_checkpoint=True)
    assert any("not of the run resumed from step 4" in str(w.message) for w in caught)
    assert sorted(set(da.read_table(out / "dora_analysis.parquet")["step"])) == [6]
    assert len(list(out.glob("dora_analysis.*.parquet"))) == 1


def test_the_run_and_the_settings_are_saved_in_the_checkpoints(tmp_path, tiny_llama):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    callback = DoraAnalysisCallback(modules=("q",), include="layers", token="secret")
    run_trainer(model, tmp_path / "run", [callback], report_to=(), steps=2)
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    entry = saved["stateful_callbacks"]["DoraAnalysisCallback"]
    assert entry["attributes"] == {"run_id": callback.run_id}
    assert entry["args"]["modules"] == ["q"] and entry["args"]["include"] == "layers"
    assert "secret" not in json.dumps(saved)  # a token is never written into a checkpoint
    rebuilt = DoraAnalysisCallback(**entry["args"])  # as restore_callback_states… does
    assert rebuilt.config == DoraAnalysisCallback(modules=("q",), include="layers").config
    from dora_analysis.integrations.transformers import plain

    assert json.dumps(plain("workers", __import__("numpy").int64(2))) == "2"
    with pytest.raises(ConfigError, match="adapter_base=.* is not a plain value"):
        plain("adapter_base", object())


def test_rotated_checkpoints_keep_their_rows_and_a_vanished_one_is_a_warning(
        tmp_path, tiny_llama):
    """A real run at save_total_limit=2: the trainer deletes checkpoint-2 and -4 as it saves
    -6 and -8, and checkpoint-4 goes before the callback reads it (another job rotating it): the
    table keeps every row it has, checkpoint-4 is a warning, the training goes on."""
    import shutil

    class Rotator(transformers.TrainerCallback):  # runs before the analysis of each save
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:
                shutil.rmtree(tmp_path / "run" / "checkpoint-4")

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run_trainer(model, tmp_path / "run", [Rotator(), DoraAnalysisCallback(
            modules=("q", "v"))], report_to=(), steps=8, save_total_limit=2)
    assert trainer.state.global_step == 8
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == [
        "checkpoint-6", "checkpoint-8"]
    messages = [str(w.message) for w in caught if w.category is AnalysisCallbackWarning]
    assert len(messages) == 1 and messages[0].startswith(
        f"{tmp_path / 'run' / 'checkpoint-4'}: not analysed (the checkpoint is gone: rotated "
        "away?) (CheckpointNotFoundError: "), messages
    written = da.read_table(tmp_path / "run" / "dora_analysis.parquet")
    assert sorted(set(written["step"])) == [2, 6, 8]  # checkpoint-2's rows kept after rotation
    later = written[written["step"] > 2]
    same_table(later, da.analyze(tiny_llama, tmp_path / "run", modules=("q", "v")))


def test_a_failure_after_the_analysis_is_a_warning_too(tmp_path, tiny_llama, monkeypatch):
    from dora_analysis.integrations import transformers as integration

    def broken(rows, history):
        raise RuntimeError("logging trouble")

    monkeypatch.setattr(integration, "module_summary", broken)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run_trainer(model, tmp_path / "run", [DoraAnalysisCallback()], report_to=(),
                              steps=2)
    messages = [str(w.message) for w in caught if w.category is AnalysisCallbackWarning]
    assert messages == [f"{tmp_path / 'run' / 'checkpoint-2'}: rows written, ΔM/ΔD not logged "
                        "(RuntimeError: logging trouble); training goes on"]
    assert trainer.state.global_step == 2
    assert (tmp_path / "run" / "dora_analysis.parquet").is_file()  # the rows were written
