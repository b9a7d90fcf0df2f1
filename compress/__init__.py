"""Making trained models cheaper: pruning, low-rank factoring, LoRA adapters and distillation
(the training-time parts that wrap a task's loss or its parameters; layer 4)."""
