"""The training-time parts of trust/ (layer 4): DP-SGD and its accounting, adversarial
examples, group-robust losses. They wrap a task's loss; they never import tasks/ or loop/."""
