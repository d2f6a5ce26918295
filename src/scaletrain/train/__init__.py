"""Training: the loop and what it drives (state, callbacks, metrics, flops, the run lease, a sweep
trial's callback, curves). Imports engines and checkpoints; no command."""
