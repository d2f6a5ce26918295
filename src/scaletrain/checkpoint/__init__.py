"""Checkpoints: the run-directory layout (`layout`, no torch), the save/resume rules every engine
shares (`manager`), the engines' file formats (`torch_state`, `deepspeed_state`, `zero_layout`,
`dcp_safe`), reading any of them (`readers`, `portable`), `consolidate`, `hf_export` and `inspect`.
A library below the engines: it imports neither `scaletrain.engines` nor `scaletrain.commands`."""
