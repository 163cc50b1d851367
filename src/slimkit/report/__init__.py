"""Reports: TensorBoard summaries, console tables, metrics JSON."""
