"""Integrations with other people's training loops. Each module imports its framework, so
import the one you use: ``from dora_analysis.integrations.transformers import
DoraAnalysisCallback``."""
