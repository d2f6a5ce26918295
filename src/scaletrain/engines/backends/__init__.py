"""One module per backend (`ddp`, `fsdp`, `deepspeed`), each declaring its spec grammar, its config
section, its checks, its builder, its memory planner and its checkpoint format as one `Backend`
object (`base`); `scaletrain.engines.registry` registers the built-ins. Nothing is imported here."""
