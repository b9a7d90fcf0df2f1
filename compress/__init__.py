"""Making trained models cheaper: pruning, low-rank factoring, LoRA adapters, distillation
and quantisation (the training-time parts that wrap a task's loss or its parameters; layer 4)."""
