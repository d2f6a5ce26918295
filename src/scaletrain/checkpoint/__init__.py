"""Checkpoints: the run-directory layout (`layout`, no torch), the save/resume rules every engine
shares (`manager`), torch-native engine files (`torch_state`), and `consolidate`."""
