"""RNN-T decoding of a trained run's eval split: greedy and beam searches, their WER / CER and
decode time per eval batch, all measured in one run.

  .venv/bin/python benchmarks/rnnt_decoding.py --workdir runs/speech_rnnt [--beam_size 4]

The beam runs with one label per frame (icefall's modified search) and with greedy's
budget (config.decoding.max_symbols_per_frame), each answered two ways: the search's own
best, and the pick of its n-best and greedy's by p(y | x) over every alignment (what the
eval reports as beam_wer). The first line counts the frames on which greedy emits two or
more labels: transcripts that a one-label-per-frame search cannot follow. Decode time
leaves the encoder out (it is shared); ratios are to greedy's.

`--differences` instead lists every utterance on which greedy and the eval's beam answer
differ, with log p(y | x) of the reference and of each answer, and sorts each decoder's word
errors into search errors (the reference is more probable than the answer: a better search
would find it) and model errors (the answer is at least as probable as the reference: no
search for the most probable transcript can fix it).
"""

import argparse
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import speech  # noqa: E402
from input_pipeline import audio  # noqa: E402
from loop import trained  # noqa: E402
from tasks import decoding  # noqa: E402
from tasks.speech import SPACE_ID, SpeechRNNT  # noqa: E402


def variants(beam_size: int, max_symbols: int) -> dict:
  """Row name -> decode(model, encoded, frames, max_len) -> (ids [B, L], lengths [B])."""
  def options(beam, beam_symbols):
    return ml_collections.ConfigDict({'beam_size': beam, 'max_symbols_per_frame': max_symbols,
                                      'beam_max_symbols_per_frame': beam_symbols})

  def search_best(beam_symbols):
    def decode(model, encoded, frames, max_len):
      ids, lengths, _ = decoding.rnnt_beam_search(
          model.joint_step, model.predict_step, model.initial_prediction(encoded.shape[0]),
          model.project_encoder(encoded), frames, max_len, beam_size, beam_symbols)
      return ids[:, 0], lengths[:, 0]
    return decode

  def transcribe(beam, beam_symbols, which):
    return lambda *args: SpeechRNNT.transcribe(*args, options(beam, beam_symbols))[which]

  return {
      f'greedy, {max_symbols} labels/frame': transcribe(0, 0, 0),
      f'beam {beam_size}, 1 label/frame, search best': search_best(1),
      f'beam {beam_size}, 1 label/frame, pick by p(y|x)': transcribe(beam_size, 1, 1),
      f'beam {beam_size}, {max_symbols} labels/frame, search best': search_best(max_symbols),
      f'beam {beam_size}, {max_symbols} labels/frame, pick by p(y|x)':
          transcribe(beam_size, max_symbols, 1),
  }


def differences(graphdef, state, exp, options) -> None:
  """Prints the utterances where greedy and the beam's answer differ, and each decoder's
  word errors split into search and model errors (see the module's docstring)."""
  @jax.jit
  def decode(state, batch):
    model = nnx.merge(graphdef, state)
    encoded, frames = model.encode(batch['features'], batch['frames'])
    labels, label_len = batch['labels'], batch['label_len']
    greedy, beam = SpeechRNNT.transcribe(model, encoded, frames, labels.shape[-1], options)
    answers = {'greedy': greedy, 'beam': beam}
    log_probs = {name: SpeechRNNT.log_prob(model, encoded, frames, *ids)
                 for name, ids in {'reference': (labels, label_len), **answers}.items()}
    word_errors = {name: decoding.error_counts(*ids, labels, label_len, SPACE_ID)[0]
                   for name, ids in answers.items()}
    return answers, log_probs, word_errors

  counts = {name: {'search': 0, 'model': 0} for name in ('greedy', 'beam')}
  differ = 0
  for batch in exp.task.eval_batches(exp.host_eval_batch):
    answers, log_probs, word_errors = jax.device_get(decode(state, batch))
    for i in np.flatnonzero(np.asarray(batch['mask']) > 0):
      text = {name: audio.decode_ids(ids[i][:lengths[i]]) for name, (ids, lengths) in answers.items()}
      for name in counts:
        if word_errors[name][i] > 0:
          below = log_probs['reference'][i] > log_probs[name][i]
          counts[name]['search' if below else 'model'] += int(word_errors[name][i])
      if text['greedy'] != text['beam']:
        differ += 1
        reference = audio.decode_ids(batch['labels'][i][:batch['label_len'][i]])
        print(f"'{reference}' (log p {log_probs['reference'][i]:.3f}): "
              + '; '.join(f"{name} '{text[name]}' (log p {log_probs[name][i]:.3f}, "
                          f'{int(word_errors[name][i])} word errors)' for name in text))
  print(f'{differ} utterances where greedy and the beam differ')
  for name, split in counts.items():
    print(f"{name}: {split['search'] + split['model']} word errors, {split['search']} on "
          f"utterances whose reference is more probable than the answer (search errors), "
          f"{split['model']} where the answer is at least as probable (model errors)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='A run of configs/speech_rnnt_*.py.')
  parser.add_argument('--beam_size', type=int, default=4)
  parser.add_argument('--max_symbols', type=int, default=0,
                      help="Greedy's and the beam's labels per frame; 0: the run's config.")
  parser.add_argument('--differences', action='store_true',
                      help='List where greedy and the beam differ; search vs model errors.')
  args = parser.parse_args()
  config = trained.read_config(args.workdir, speech.get_speech_config())
  model, exp, step = trained.load_model(config, args.workdir)
  graphdef, state = nnx.split(model)
  max_symbols = args.max_symbols or config.decoding.max_symbols_per_frame
  if args.differences:
    print(f'{args.workdir} at step {step}, beam {args.beam_size}, {max_symbols} labels/frame:')
    differences(graphdef, state, exp, ml_collections.ConfigDict(
        {'beam_size': args.beam_size, 'max_symbols_per_frame': max_symbols,
         'beam_max_symbols_per_frame': max_symbols}))
    return

  @jax.jit
  def encode(state, features, frames):
    return nnx.merge(graphdef, state).encode(features, frames)

  def compiled(decode):
    @jax.jit
    def run(state, encoded, frames, labels, label_len, mask):
      hyp, hyp_len = decode(nnx.merge(graphdef, state), encoded, frames, labels.shape[-1])
      counts = decoding.error_counts(hyp, hyp_len, labels, label_len, SPACE_ID)
      return tuple(jnp.sum(c * mask) for c in counts)
    return run

  @jax.jit
  def greedy_length(state, encoded, frames):
    m = nnx.merge(graphdef, state)
    return decoding.rnnt_greedy(m.joint_step, m.predict_step,
                                m.initial_prediction(encoded.shape[0]),
                                m.project_encoder(encoded), frames, 4 * encoded.shape[1],
                                max_symbols)[1]

  rows = {name: compiled(decode) for name, decode in variants(args.beam_size, max_symbols).items()}
  totals = {name: np.zeros(4) for name in rows}
  times = {name: [] for name in rows}
  crowded = frames_total = 0
  for batch in exp.task.eval_batches(exp.host_eval_batch):
    encoded, frames = encode(state, batch['features'], batch['frames'])
    inputs = (encoded, frames, batch['labels'], batch['label_len'], batch['mask'])
    for name, run in rows.items():
      jax.block_until_ready(run(state, *inputs))  # Compiles once; then a timed call.
      start = time.perf_counter()
      totals[name] += np.asarray(jax.block_until_ready(run(state, *inputs)))
      times[name].append(time.perf_counter() - start)
    # Greedy is causal: its length after the first t frames, for every t, gives the labels
    # it emits on each frame.
    real = np.asarray(batch['mask']) > 0
    previous = np.zeros(len(real), np.int64)
    for t in range(encoded.shape[1]):
      now = np.asarray(greedy_length(state, encoded, jnp.minimum(frames, t + 1)))
      on_frame = (now - previous)[real & (np.asarray(frames) > t)]
      crowded += int(np.sum(on_frame >= 2))
      frames_total += on_frame.size
      previous = now
  print(f'{args.workdir} at step {step}: greedy emits 2+ labels on {crowded} of {frames_total} '
        f'frames ({100 * crowded / frames_total:.2f}%)')
  base = statistics.median(times[next(iter(rows))])
  print(f"{'decoding':<46} {'WER':>7} {'CER':>7} {'ms/batch':>9} {'x greedy':>9}")
  for name, (word_errors, words, char_errors, chars) in totals.items():
    ms = statistics.median(times[name])
    print(f'{name:<46} {100 * word_errors / words:6.2f}% {100 * char_errors / chars:6.2f}% '
          f'{1000 * ms:9.1f} {ms / base:9.2f}')


if __name__ == '__main__':
  main()
