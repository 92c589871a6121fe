"""Integrations with other people's tools. Each module imports its framework, so import the one
you use: ``from dora_analysis.integrations.transformers import DoraAnalysisCallback`` (training
loops), ``dora_analysis.integrations.dask`` (the analysis on a Dask cluster)."""
