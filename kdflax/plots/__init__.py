"""kdflax.plots: pictures of finished runs (learning curves, teacher vs student attention).

Reads what training wrote (`metrics.jsonl`, model directories); writes PNGs with Matplotlib's
non-interactive Agg backend, atomically. `kdflax figures` is the command.
"""
