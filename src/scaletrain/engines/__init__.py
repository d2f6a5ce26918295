"""Engines behind one interface (`base`), one module per backend (`backends`: spec grammar, config
section, checks, builder, planner and checkpoint format each), collected by the registry
(`registry`): the torch-native engine (DDP, FSDP2, tensor parallel) and DeepSpeed ZeRO, with what
they compose (`parallel`, `tensor_parallel`, `ds_config`), the memory planner (`plan`, on the shared
pieces of `memory`) and ahead-of-time conversion (`convert`). Nothing is imported here, so reading a
torch-free module of this package (`ds_config`, `registry`, `backends`) stays torch-free."""
