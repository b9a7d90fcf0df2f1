"""Per problem: the model it builds, its loss, its eval metrics, its input pipeline."""

from tasks.base import Task
from tasks.classification import ImageClassification
from tasks.detection import Detection
from tasks.language import CausalLanguageModeling, MaskedLanguageModeling
from tasks.speech import SpeechClassification, SpeechCTC, SpeechRNNT
from tasks.text_classification import SequenceClassification
from core.errors import KilnError

TASKS = {
    'classification': ImageClassification,
    'causal_lm': CausalLanguageModeling,
    'masked_lm': MaskedLanguageModeling,
    'sequence_classification': SequenceClassification,
    'speech_classification': SpeechClassification,
    'speech_ctc': SpeechCTC,
    'speech_rnnt': SpeechRNNT,
    'detection': Detection,
}


def create_task(config) -> Task:
  if config.task not in TASKS:
    raise KilnError(f"unknown task '{config.task}': set config.task to one of "
                    f"{', '.join(sorted(TASKS))}")
  return TASKS[config.task](config)
