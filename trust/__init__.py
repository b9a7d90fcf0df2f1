"""Trust: privacy, fairness and robustness of trained models. The audits here use whole runs
(layer 2); trust/training/ holds what wraps a task's loss inside the train step (layer 4)."""
