"""Orchestration: the `seg` CLI (typer) and one Prefect flow per pipeline stage."""
