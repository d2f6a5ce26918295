"""Models: the built-in GPT (`gpt`), building the configured model (`build`), materialising one from
the meta device (`materialize`) and the canonical parameter names every checkpoint uses (`weights`).
Knows nothing of engines."""
