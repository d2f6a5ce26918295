"""Engines behind one interface (`base`), chosen through the backend registry (`registry`): the
torch-native engine (DDP, FSDP2, tensor parallel) and DeepSpeed ZeRO, with what they compose
(`parallel`, `tensor_parallel`, `ds_config`), the memory planner (`plan`) and ahead-of-time
conversion (`convert`). Nothing is imported here, so reading a torch-free module of this package
(`ds_config`, `registry`) stays torch-free."""
