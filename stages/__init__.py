"""Orchestration: the `seg` CLI (typer), the stage functions, and the Prefect flow over DVC."""
