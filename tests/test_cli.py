"""dora-analyze: success output, and every bad-input path (exit 2, one line, nothing written)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from dora_analysis.cli import main
from dora_analysis.io.guard import path_kind
from tests.common import write_sharded


def exists(path: str | Path) -> bool:
    return path_kind(path) is not None  # Path.exists() raises for over-long names


def digest(paths) -> dict[Path, str]:
    out = {}
    for p in paths:
        files = sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]
        for f in files:
            if f.is_file():
                out[f] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_success_writes_table_and_summary(ckpts, tmp_path, capsys):
    out, summary = tmp_path / "deltas.csv", tmp_path / "corr.parquet"
    rc = main([str(ckpts["base"]), str(ckpts["series"]), str(ckpts["tuned"]), "--label", "run",
               "FT", "--method", "ft", "--modules", "q,v", "-o", str(out), "--summary",
               str(summary)])
    captured = capsys.readouterr()
    assert rc == 0
    assert "run  (method: ft, steps: 10, 20, 30)" in captured.out
    assert "FT  (method: ft)" in captured.out and "Pearson r" in captured.out
    table = pd.read_csv(out)
    assert set(table["checkpoint"]) == {"run", "FT"} and set(table["module"]) == {"q", "v"}
    corr = pd.read_parquet(summary)
    assert len(corr) == 4 and set(corr["module"]) == {"q", "v"}
    assert f"wrote {out}" in captured.err


def test_summary_has_the_diagnostics_and_n_boot_sets_the_interval(ckpts, tmp_path, capsys):
    summary = tmp_path / "corr.csv"
    argv = [str(ckpts["base"]), str(ckpts["series"]), "--summary", str(summary), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "95% CI (layers)" in out and "within-step r" in out
    corr = pd.read_csv(summary)
    for col in ("within_step_r", "within_layer_r", "partial_r", "r_ci_low", "r_ci_high"):
        assert col in corr
    assert corr["r_ci_low"].notna().any()
    assert main(argv + ["--n-boot", "0"]) == 0
    assert pd.read_csv(summary)["r_ci_low"].isna().all()


def test_json_output_and_axis(ckpts, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main([str(ckpts["base"]), str(ckpts["tuned"]), "--axis", "both", "-o", str(out),
                 "--quiet"]) == 0
    table = pd.read_json(out)
    assert set(table["axis"]) == {"out", "in"}
    captured = capsys.readouterr()
    assert captured.err == "" and "axis" in captured.out


def test_html_report(ckpts, tmp_path, capsys):
    report = tmp_path / "report.html"
    assert main([str(ckpts["base"]), str(ckpts["series"]), "--html", str(report)]) == 0
    text = report.read_text()
    assert "Plotly.newPlot" in text and "run (unknown)" in text
    assert main([str(ckpts["base"]), str(ckpts["series"]), "--html", str(tmp_path / "r.pdf")]) == 2
    assert "unknown output format '.pdf'" in capsys.readouterr().err


def test_console_script_runs_without_a_terminal(ckpts, tmp_path):
    exe = Path(sys.executable).with_name("dora-analyze")
    proc = subprocess.run([str(exe), str(ckpts["base"]), str(ckpts["tuned"])],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "tuned  (method: unknown)" in proc.stdout
    assert "analysing" not in proc.stderr  # no progress bar when stderr is not a terminal


def _bad_inputs(ckpts, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name → (argv, text the error line must contain)."""
    base, tuned = str(ckpts["base"]), str(ckpts["tuned"])
    cut = tmp / "cut.safetensors"
    data = ckpts["tuned"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    noise = tmp / "noise.safetensors"
    noise.write_bytes(os.urandom(4096))
    empty = tmp / "empty"
    empty.mkdir()
    evil = tmp / "evil.bin"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp / "pwned"),))

    evil.write_bytes(pickle.dumps({"w.weight": Evil()}))
    state = load_file(tuned)
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = state[name].T.contiguous()
    transposed = tmp / "transposed.safetensors"
    save_file(state, str(transposed))
    no_weights = tmp / "adapter_no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    broken = tmp / "adapter_broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 2, "lora_alpha": ')
    (broken / "adapter_model.safetensors").write_bytes(b"")
    other = tmp / "adapter_other_base"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_A.weight": torch.ones(2, 99), f"{q}.lora_B.weight": torch.ones(24, 2)},
              str(other / "adapter_model.safetensors"))
    nf4 = tmp / "nf4.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 1, dtype=torch.uint8),
               "model.layers.0.mlp.up_proj.weight.absmax": torch.ones(1)}, str(nf4))
    return {
        "adapter without weights": ([base, str(no_weights)], "adapter folder without weights"),
        "broken adapter config": ([base, str(broken)], "broken adapter config"),
        "adapter for another base": ([base, str(other)], "adapter [24, 99] vs base"),
        "4-bit quantized": ([base, str(nf4)], "bitsandbytes 4-bit"),
        "missing base": ([str(tmp / "nope.safetensors"), tuned], "nope.safetensors: no such"),
        "missing tuned": ([base, str(tmp / "gone")], "gone: no such file"),
        "truncated": ([base, str(cut)], "cut.safetensors"),
        "random bytes": ([base, str(noise)], "noise.safetensors: not a readable safetensors"),
        "empty folder": ([base, str(empty)], "no checkpoint found"),
        "pickle with code": ([base, str(evil)], "refused to unpickle"),
        "transposed": ([base, str(transposed)],
                       "up_proj.weight: [40, 16] vs [16, 40] (transposed?)"),
        "unknown suffix": ([base, tuned, "-o", str(tmp / "t.xlsx")], "unknown output format"),
        "no output folder": ([base, tuned, "-o", str(tmp / "no" / "t.csv")], "does not exist"),
        "same outputs": ([base, tuned, "-o", str(tmp / "a.csv"), "--summary", str(tmp / "a.csv")],
                         "same file"),
        "bad regex": ([base, tuned, "--include", "(["], "--include is not a valid"),
        "no module": ([base, tuned, "--modules", "nothing"], "module kinds present"),
        "label count": ([base, tuned, tuned, "--label", "a", "b", "c"], "--label was given 3"),
        "duplicate label": ([base, tuned, tuned], "distinct --label"),
        "hub offline": ([base, "org/model"], "org/model: not in the local cache"),
        **_second_round(ckpts, tmp),
        "negative n-boot": ([base, tuned, "--n-boot", "-1"], "--n-boot must be 0 or more"),
    }


def _adapter(folder: Path, config: dict | str, a_shape=(2, 16), b_shape=(24, 2)) -> Path:
    folder.mkdir()
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{q}.lora_A.weight": torch.ones(a_shape), f"{q}.lora_B.weight": torch.ones(b_shape)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(config if isinstance(config, str)
                                                else json.dumps(config))
    return folder


def _sharded(ckpts, folder: Path, edit) -> Path:
    index = write_sharded(load_file(ckpts["tuned"]), folder)
    data = json.loads(index.read_text())
    raw = edit(data, folder)  # edits the index in place, or returns its new text
    index.write_text(raw if raw is not None else json.dumps(data))
    return folder


def _second_round(ckpts, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Issue 17's inputs: every one once handled with a traceback or the wrong advice."""
    base, tuned = str(ckpts["base"]), str(ckpts["tuned"])
    r = {"r": 2, "lora_alpha": 4}

    def first_value(value):
        def edit(data, folder):
            data["weight_map"][next(iter(data["weight_map"]))] = value
        return edit

    def drop_shard(data, folder):
        (folder / "model-00002-of-00002.safetensors").unlink()

    def deep(data, folder):
        return "[" * 100_000 + "]" * 100_000

    fifo = tmp / "fifo.safetensors"
    os.mkfifo(fifo)
    long_name = "a" * 300 + ".safetensors"
    return {
        "rank mismatch": ([base, str(_adapter(tmp / "rank", r, b_shape=(24, 3)))],
                          "'model.layers.0.self_attn.q_proj': lora_A [2, 16] and lora_B [24, 3] "
                          "do not share a rank"),
        "invalid rank_pattern regex": (
            [base, str(_adapter(tmp / "regex", {**r, "rank_pattern": {"q_proj[": 2}}))],
            "'rank_pattern' has an invalid regular expression 'q_proj['"),
        "non-numeric alpha_pattern": (
            [base, str(_adapter(tmp / "alpha", {**r, "alpha_pattern": {"q_proj": "big"}}))],
            "'alpha_pattern' gives 'q_proj' the value 'big'; it must be a positive number"),
        "rank_pattern not an object": (
            [base, str(_adapter(tmp / "plist", {**r, "rank_pattern": ["q_proj"]}))],
            "'rank_pattern' must be an object"),
        "deeply nested adapter config": (
            [base, str(_adapter(tmp / "deepcfg", '{"r": 2, "x": ' + "[" * 100_000))],
            "adapter_config.json: broken adapter config (nested too deeply)"),
        "index values not strings": ([base, str(_sharded(ckpts, tmp / "int", first_value(3)))],
                                     "weight_map values must be shard file names"),
        "index climbing out": (
            [base, str(_sharded(ckpts, tmp / "up", first_value("../tuned.safetensors")))],
            "weight_map values must be shard file names beside the index"),
        "deeply nested index": ([base, str(_sharded(ckpts, tmp / "deep", deep))],
                                "not a valid shard index (nested too deeply)"),
        "index with a missing shard": (
            [base, str(_sharded(ckpts, tmp / "gone_shard", drop_shard))],
            "index.json: the index lists 1 shard file(s) that are not beside it "
            "(model-00002-of-00002.safetensors); the index and the shard files do not match"),
        "FIFO": ([base, str(fifo)], "fifo.safetensors: not a regular file"),
        "device": ([base, "/dev/null"], "/dev/null: not a regular file"),
        "over-long input name": ([base, str(tmp / long_name)], "name too long for the file system"),
        "over-long output name": ([base, tuned, "-o", str(tmp / ("b" * 300 + ".csv"))],
                                  "the file name is 304 bytes, longer than the file system allows"),
        "output is a FIFO": ([base, tuned, "-o", str(tmp / "out.csv"), "--summary", str(
            _fifo(tmp / "s.csv"))], "s.csv: is not a regular file"),
    }


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


CASES = ["adapter without weights", "broken adapter config", "adapter for another base",
         "4-bit quantized", "missing base", "missing tuned", "truncated", "random bytes",
         "empty folder", "pickle with code", "transposed", "unknown suffix", "no output folder",
         "same outputs",
         "bad regex", "no module", "label count", "duplicate label", "hub offline",
         "rank mismatch", "invalid rank_pattern regex", "non-numeric alpha_pattern",
         "rank_pattern not an object", "deeply nested adapter config", "index values not strings",
         "index climbing out", "deeply nested index", "index with a missing shard", "FIFO",
         "device", "over-long input name", "over-long output name", "output is a FIFO",
         "negative n-boot"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(case, ckpts, tmp_path, capsys):
    argv, expected = _bad_inputs(ckpts, tmp_path)[case]
    watched = [ckpts["root"], *(Path(a) for a in argv if exists(a))]
    before = digest(watched)
    files_before = set(tmp_path.rglob("*"))
    rc = main(argv + ["-o", str(tmp_path / "never.csv")] if "-o" not in argv else argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == files_before  # no output, no temp file left behind
    assert digest(watched) == before  # inputs untouched
    assert not (tmp_path / "pwned").exists()


def test_error_line_from_the_real_process(ckpts, tmp_path):
    exe = Path(sys.executable).with_name("dora-analyze")
    proc = subprocess.run([str(exe), str(ckpts["base"]), str(tmp_path / "missing")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or "
                                                "folder"]


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["only-one-arg"])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_non_finite_weights_warn_on_one_line(ckpts, tmp_path, capsys):
    state = load_file(str(ckpts["tuned"]))
    state["model.layers.0.self_attn.k_proj.weight"][0, 0] = float("inf")
    bad = tmp_path / "inf.safetensors"
    save_file(state, str(bad))
    assert main([str(ckpts["base"]), str(bad), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "k_proj" in err[0]


def test_skip_mismatched_flag(ckpts, tmp_path, capsys):
    state = load_file(str(ckpts["tuned"]))
    state["model.embed_tokens.weight"] = torch.zeros(52, 16)
    resized = tmp_path / "resized.safetensors"
    save_file(state, str(resized))
    assert main([str(ckpts["base"]), str(resized)]) == 2
    assert main([str(ckpts["base"]), str(resized), "--skip-mismatched"]) == 0
    assert "warning: skipped 1 tensor" in capsys.readouterr().err


HEAVY = ("torch", "pandas", "scipy", "plotly", "numpy")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["base", "tuned", "--axis", "x"]])
def test_help_and_argument_errors_import_nothing_heavy(argv):
    code = ("import sys\nfrom dora_analysis.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout + proc.stderr


def test_import_dora_analysis_is_light_and_names_load_on_use():
    code = ("import sys, dora_analysis as da\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
            "assert callable(da.analyze) and 'torch' not in sys.modules\n"
            "assert set(da.__all__) <= set(dir(da))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_public_names_are_exactly_the_lazy_exports():
    import dora_analysis as da

    assert set(da.__all__) - {"__version__"} == set(da._EXPORTS)


def test_outputs_are_all_or_nothing(ckpts, tmp_path, capsys, monkeypatch):
    """-o, --summary and --html together: one failing leaves none of them, old files intact."""
    from dora_analysis import report

    out, summary, html = tmp_path / "t.csv", tmp_path / "s.parquet", tmp_path / "r.html"
    out.write_text("old table")

    def disk_full(frame, path):
        path.write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(report.TABLE_WRITERS, ".parquet", disk_full)
    before = digest([ckpts["root"]])
    rc = main([str(ckpts["base"]), str(ckpts["tuned"]), "-o", str(out), "--summary",
               str(summary), "--html", str(html)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {summary}: cannot write (No space left on device); no "
                               "output was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]  # no temps, no new files
    assert out.read_text() == "old table" and digest([ckpts["root"]]) == before


def test_long_output_names_and_the_umask(ckpts, tmp_path, capsys):
    out = tmp_path / ("t" * 246 + ".parquet")  # 254 bytes: legal, and the temp name is short
    previous = os.umask(0o002)
    try:
        assert main([str(ckpts["base"]), str(ckpts["tuned"]), "-o", str(out), "-q"]) == 0
    finally:
        os.umask(previous)
    assert len(pd.read_parquet(out)) > 0
    assert out.stat().st_mode & 0o777 == 0o664
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_file_names_that_are_not_utf8(ckpts, tmp_path, capsys):
    tuned = tmp_path / os.fsdecode(b"tuned\xff.safetensors")
    tuned.write_bytes(ckpts["tuned"].read_bytes())
    out = tmp_path / os.fsdecode(b"out\xfe.csv")
    assert main([str(ckpts["base"]), str(tuned), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "tuned\\xff  (method: unknown)" in captured.out
    assert f"wrote {tmp_path}/out\\xfe.csv" in captured.err
    table = pd.read_csv(out)
    assert set(table["checkpoint"]) == {"tuned\\xff"} and table["ref"].str.endswith(
        "tuned\\xff.safetensors").all()
    assert main([str(ckpts["base"]), str(tmp_path / os.fsdecode(b"gone\xff"))]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}/gone\\xff: no such file or folder\n"


def test_spectrum_and_intruders_switches(ckpts, tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main([str(ckpts["base"]), str(ckpts["tuned"]), "--modules", "q", "--spectrum",
                 "--intruders", "--intruder-k", "3", "--svd-cache", str(tmp_path / "svd"),
                 "-o", str(out), "-q"]) == 0
    table = pd.read_csv(out)
    for col in ("update_norm", "effective_rank", "energy_rank_90", "amplification", "intruders",
                "warnings", "tangential_fraction"):
        assert col in table
    assert len(list((tmp_path / "svd" / "base-svd").glob("*.npz"))) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_device_cuda_without_a_gpu_is_one_error_line(ckpts, tmp_path, capsys):
    out = tmp_path / "t.csv"
    rc = main([str(ckpts["base"]), str(ckpts["tuned"]), "--spectrum", "--device", "cuda",
               "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --device cuda: no CUDA GPU is available here; use "
                               "--device cpu"]
    assert not out.exists()
    assert main([str(ckpts["base"]), str(ckpts["tuned"]), "--device", "tpu"]) == 2
    assert capsys.readouterr().err == ("error: --device must be cpu, cuda or cuda:N, got "
                                       "'tpu'\n")


# -- issue 21, items 11 and 13: --modules entries and metric settings, checked before any work --
def _rows(ckpts, tmp_path, *args) -> pd.DataFrame:
    out = tmp_path / "t.csv"
    assert main([str(ckpts["base"]), str(ckpts["tuned"]), *args, "-o", str(out), "-q"]) == 0
    return pd.read_csv(out)


def test_modules_takes_kinds_and_the_modules_own_names(ckpts, tmp_path, capsys):
    assert set(_rows(ckpts, tmp_path, "--modules", "q_proj,v")["module"]) == {"q", "v"}
    assert set(_rows(ckpts, tmp_path, "--modules", "q_proj")["module"]) == {"q"}
    assert set(_rows(ckpts, tmp_path, "--modules", "mlp.down_proj,lm_head")["module"]) == {
        "down", "lm_head"}
    help_text = " ".join(__import__("dora_analysis.cli", fromlist=["x"]).build_parser()
                         .format_help().split())
    assert "the modules' own names (q_proj, query, mlp.down_proj)" in help_text
    capsys.readouterr()
    assert set(_rows(ckpts, tmp_path, "--modules", "q,k", "--include", "q_proj")["module"]) == {
        "q"}
    assert capsys.readouterr().err == (
        "warning: --modules k: no rows; no tuned checkpoint holds such a matrix (an adapter "
        "holds only the modules it trains, or --include leaves them out); kinds analysed: q\n")


@pytest.mark.parametrize("args, line", [
    (["--modules", "q,value"], "--modules value: no module of {base} has that kind or name; "
     "module kinds present: down, embed_tokens, gate, k, lm_head, o, q, up, v (a module's own "
     "name, such as q_proj, works too)"),
    (["--modules", "qq,q_proj,vv"], "--modules qq, vv: no module of {base}"),
    (["--spectrum", "--amplification-rank", "0"],
     "--amplification-rank must be a positive whole number, got 0"),
    (["--amplification-rank", "-5"],
     "--amplification-rank must be a positive whole number, got -5"),
    (["--intruders", "--intruder-k", "0"], "--intruder-k must be a positive whole number, got 0"),
    (["--intruder-eps", "1.5"], "--intruder-eps must be a number in (0, 1], got 1.5"),
    (["--intruder-eps", "nan"], "--intruder-eps must be a number in (0, 1], got nan"),
])
def test_bad_modules_and_settings_are_one_error_line_before_any_work(ckpts, tmp_path, capsys,
                                                                     args, line):
    out = tmp_path / "t.csv"
    rc = main([str(ckpts["base"]), str(ckpts["tuned"]), *args, "-o", str(out)])
    lines = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {line.format(base=ckpts['base'])}"), lines
    assert not out.exists()
