"""Request bodies -> input arrays, and output arrays -> response bodies, with TF Serving's
conventions: `instances` (row format, one object per example; a bare value where the model
has one input) or `inputs` (columnar, one batched value per input), answered by
`predictions` or `outputs` alike. Binary values come as {"b64": "..."}.

Task-aware inputs: an image input takes a base64 PNG/JPEG ({"b64": ...}; decoded to [0, 1]
pixels, resized to the model's size); a text classifier takes {"text": "..."} instead of
tokens (tokenised here as its training data was); a speech model takes {"wav": {"b64": ...}}
(or a bare {"b64": ...}) instead of features: mono 16-bit PCM at the training data's rate,
turned into log-mel features by input_pipeline/audio.py as training did. Outputs gain class
names where the data has them and, for CTC models, greedy transcripts. Every bad value is a
RequestError naming the field (`instances[3].image`), answered 4xx, never 500.
"""

import base64
import binascii
import dataclasses
import functools
import io
import json
import math
import wave
from typing import Any

import numpy as np
import orjson

from input_pipeline import audio, labeled_text
from serve.model import ServedModel

MAX_IMAGE_PIXELS = 4096 * 4096  # Decoded images above this are refused (decompression bombs).


class RequestError(Exception):
  """A client error: HTTP `status` with `message` (the response's {"error": ...})."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


def _reject_constant(name: str):
  raise RequestError(400, f'body: {name} is not a JSON number (send finite numbers)')


def loads(body: bytes) -> Any:
  """JSON -> Python, refusing NaN / Infinity (Python's json accepts them). orjson parses a
  valid body in a fifth of the time; a body it refuses goes to Python's json, which names the
  problem (and takes what orjson alone refuses: integers past 64 bits, lone surrogates)."""
  try:
    return orjson.loads(body)
  except orjson.JSONDecodeError:
    pass
  try:
    return json.loads(body, parse_constant=_reject_constant)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RequestError(400, f'body is not valid JSON: {e}') from None
  except RecursionError:
    raise RequestError(400, 'body is nested too deeply') from None


def dumps(payload: Any) -> bytes:
  return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


# ----------------------------------------------------------------------------- inputs

def text_inputs(model: ServedModel) -> bool:
  """Whether the model takes {"text": ...}: a text classifier whose tokenizer came along."""
  return model.tokenizer is not None and set(model.inputs) == {'tokens', 'token_mask'}


def _encode_text(model: ServedModel, texts: list[str]) -> dict[str, np.ndarray]:
  seq_len = model.inputs['tokens'][0][0]
  tokens, token_mask = labeled_text.encode_examples(texts, model.tokenizer, seq_len)
  return {'tokens': tokens.astype(model.inputs['tokens'][1]),
          'token_mask': token_mask.astype(model.inputs['token_mask'][1])}


def _binary(field: str, value: Any) -> bytes:
  if not isinstance(value, dict) or set(value) != {'b64'} or not isinstance(value['b64'], str):
    raise RequestError(400, f'{field}: a binary value is {{"b64": "<base64 string>"}}')
  try:
    return base64.b64decode(value['b64'], validate=True)
  except (binascii.Error, ValueError):
    raise RequestError(400, f'{field}: b64 is not valid base64') from None


def wav_inputs(model: ServedModel) -> bool:
  """Whether the model takes {"wav": ...}: a speech model whose feature settings came along."""
  return model.audio_spec is not None and set(model.inputs) == {'features', 'frames'}


def _decode_wav(field: str, value: Any, spec: audio.FeatureSpec) -> np.ndarray:
  """A base64 WAV -> float32 samples in [-1, 1), only as many as max_frames frames use."""
  data = _binary(field, value)
  try:
    with wave.open(io.BytesIO(data)) as f:
      width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
      raw = f.readframes(f.getnframes())
  except (wave.Error, EOFError, ValueError):
    raise RequestError(400, f'{field}: b64 is not a WAV file') from None
  if width != 2 or channels != 1:
    raise RequestError(400, f'{field}: WAV must be mono 16-bit PCM (got {channels} channel(s) '
                       f'of {8 * width} bits)')
  if rate != spec.sample_rate:
    raise RequestError(400, f'{field}: WAV at {rate} Hz; this model hears {spec.sample_rate} Hz '
                       '(resample it)')
  needed = spec.window + spec.hop * (spec.max_frames - 1)  # Later samples make no kept frame.
  samples = np.frombuffer(raw[:2 * needed], '<i2').astype(np.float32) / 32768.0
  if not len(samples):
    raise RequestError(400, f'{field}: WAV holds no samples')
  return samples


def _wav_features(model: ServedModel, waveforms: list[np.ndarray]) -> dict[str, np.ndarray]:
  features, frames = audio.batch_features(waveforms, model.audio_spec)
  return {'features': features.astype(model.inputs['features'][1]),
          'frames': frames.astype(model.inputs['frames'][1])}


def _decode_image(field: str, value: dict, shape: tuple[int, ...]) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  data = _binary(field, value)
  if len(shape) != 3 or shape[-1] not in (1, 3):
    raise RequestError(400, f'{field}: this input takes arrays of shape {list(shape)}, not images')
  try:
    image = Image.open(io.BytesIO(data))
    if image.size[0] * image.size[1] > MAX_IMAGE_PIXELS:
      raise RequestError(413, f'{field}: image of {image.size[0]}x{image.size[1]} pixels is '
                         f'over {MAX_IMAGE_PIXELS} pixels')
    image = image.convert('L' if shape[-1] == 1 else 'RGB')
    height, width = shape[:2]
    if image.size != (width, height):
      image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.float32) / 255.0
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
    raise RequestError(400, f'{field}: b64 is not a PNG or JPEG image') from None
  return pixels.reshape(shape)


def _array(field: str, value: Any, shape: tuple[int, ...], dtype: np.dtype,
           vocab_size: int | None, flat: bool = False) -> np.ndarray:
  """One example's value as an array of exactly `shape` and `dtype`; `flat` also takes the
  values in row-major order as one list (the v2 protocol's `data`)."""
  if isinstance(value, dict):
    return _decode_image(field, value, shape).astype(dtype)
  try:
    array = np.array(value)
  except (ValueError, TypeError):
    raise RequestError(400, f'{field}: ragged nested lists (expected shape {list(shape)})'
                       ) from None
  if array.dtype.kind not in 'biuf':
    raise RequestError(400, f'{field}: expected numbers of dtype {dtype.name}, shape '
                       f'{list(shape)}')
  if flat and array.ndim == 1 and array.size == math.prod(shape):
    array = array.reshape(shape)
  if array.shape != shape:
    raise RequestError(400, f'{field}: shape {list(array.shape)} != expected {list(shape)}')
  if dtype.kind in 'iu':
    if array.dtype.kind == 'f' and not np.all(np.isfinite(array) & (array == np.round(array))):
      raise RequestError(400, f'{field}: expected integers ({dtype.name})')
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
      raise RequestError(400, f'{field}: values outside {dtype.name}')
    if vocab_size is not None and array.size and (array.min() < 0 or array.max() >= vocab_size):
      raise RequestError(400, f'{field}: token ids must be in [0, {vocab_size})')
  elif array.dtype.kind == 'f' and not np.all(np.isfinite(array)):
    raise RequestError(400, f'{field}: values must be finite')
  elif array.dtype.kind == 'f' and np.any(np.abs(array) > np.finfo(dtype).max):
    raise RequestError(400, f'{field}: values overflow {dtype.name}')
  return array.astype(dtype)


def _check_count(field: str, n: int, model: ServedModel) -> None:
  if n == 0:
    raise RequestError(400, f'{field}: no examples')
  if n > model.max_batch_size:
    raise RequestError(413, f'{field}: {n} examples exceed max_batch_size={model.max_batch_size}'
                       ': split the request')


def _vocab(model: ServedModel, name: str) -> int | None:
  return model.tokenizer.vocab_size if model.tokenizer is not None and name == 'tokens' else None


def _rows(payload: list, model: ServedModel) -> dict[str, np.ndarray]:
  _check_count('instances', len(payload), model)
  names = list(model.inputs)
  text, wav = text_inputs(model), wav_inputs(model)
  columns: dict[str, list] = {name: [] for name in names}
  texts, waves = [], []
  for i, instance in enumerate(payload):
    field = f'instances[{i}]'
    if text and isinstance(instance, dict) and 'text' in instance:
      if set(instance) != {'text'} or not isinstance(instance['text'], str):
        raise RequestError(400, f'{field}: give {{"text": "<string>"}} or the token inputs')
      texts.append((i, instance['text']))
      continue
    if wav and isinstance(instance, dict) and ('wav' in instance or set(instance) == {'b64'}):
      if 'wav' in instance and set(instance) != {'wav'}:
        raise RequestError(400, f'{field}: give {{"wav": {{"b64": ...}}}} or the feature inputs')
      waves.append((i, _decode_wav(f'{field}.wav', instance.get('wav', instance),
                                   model.audio_spec)))
      continue
    if len(names) == 1 and not (isinstance(instance, dict) and set(instance) != {'b64'}):
      instance = {names[0]: instance}
    if not isinstance(instance, dict):
      raise RequestError(400, f'{field}: expected an object with inputs {names}')
    missing, unknown = set(names) - set(instance), set(instance) - set(names)
    if missing or unknown:
      what = (f"missing input '{sorted(missing)[0]}'" if missing
              else f"unknown input '{sorted(unknown)[0]}'")
      raise RequestError(400, f'{field}: {what} (inputs: {names}'
                         f"{', or text' if text else ''})")
    for name in names:
      shape, dtype = model.inputs[name]
      columns[name].append((i, _array(f'{field}.{name}', instance[name], shape, dtype,
                                      _vocab(model, name))))
  for done, encode in ((texts, _encode_text), (waves, _wav_features)):
    if done:
      encoded = encode(model, [x for _, x in done])
      for name in names:
        columns[name].extend((i, encoded[name][row]) for row, (i, _) in enumerate(done))
  return {name: np.stack([a for _, a in sorted(columns[name], key=lambda x: x[0])])
          for name in names}


def _columns(payload: Any, model: ServedModel) -> dict[str, np.ndarray]:
  names = list(model.inputs)
  if text_inputs(model) and isinstance(payload, dict) and set(payload) == {'text'}:
    texts = payload['text']
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
      raise RequestError(400, 'inputs.text: expected a list of strings')
    _check_count('inputs.text', len(texts), model)
    return _encode_text(model, texts)
  if wav_inputs(model) and isinstance(payload, dict) and set(payload) == {'wav'}:
    if not isinstance(payload['wav'], list):
      raise RequestError(400, 'inputs.wav: expected a list of {"b64": ...} values')
    _check_count('inputs.wav', len(payload['wav']), model)
    return _wav_features(model, [_decode_wav(f'inputs.wav[{i}]', v, model.audio_spec)
                                 for i, v in enumerate(payload['wav'])])
  if len(names) == 1 and not isinstance(payload, dict):
    payload = {names[0]: payload}
  if not isinstance(payload, dict):
    raise RequestError(400, f'inputs: expected an object with inputs {names}')
  missing, unknown = set(names) - set(payload), set(payload) - set(names)
  if missing:
    raise RequestError(400, f"inputs: missing input '{sorted(missing)[0]}' (inputs: {names})")
  if unknown:
    raise RequestError(400, f"inputs: unknown input '{sorted(unknown)[0]}' (inputs: {names})")
  arrays, count = {}, None
  for name in names:
    value, field = payload[name], f'inputs.{name}'
    if not isinstance(value, list):
      raise RequestError(400, f'{field}: expected a list with one entry per example')
    _check_count(field, len(value), model)
    if count is not None and len(value) != count:
      raise RequestError(400, f'{field}: {len(value)} examples, but other inputs have {count}')
    count = len(value)
    shape, dtype = model.inputs[name]
    arrays[name] = np.stack([_array(f'{field}[{i}]', v, shape, dtype, _vocab(model, name))
                             for i, v in enumerate(value)])
  return arrays


def parse_predict(payload: Any, model: ServedModel) -> tuple[dict[str, np.ndarray], bool]:
  """(batched input arrays, columnar?) from a :predict body already parsed from JSON."""
  if not isinstance(payload, dict):
    raise RequestError(400, 'body: expected a JSON object with "instances" or "inputs"')
  signature = payload.get('signature_name', 'serving_default')
  if signature != 'serving_default':
    raise RequestError(400, f"signature_name: '{signature}' is not a signature of this model "
                       "(it has 'serving_default')")
  unknown = set(payload) - {'instances', 'inputs', 'signature_name'}
  if unknown:
    raise RequestError(400, f"body: unknown field '{sorted(unknown)[0]}'")
  if ('instances' in payload) == ('inputs' in payload):
    raise RequestError(400, 'body: give exactly one of "instances" (row format) or "inputs" '
                       '(columnar format)')
  if 'instances' in payload:
    if not isinstance(payload['instances'], list):
      raise RequestError(400, 'instances: expected a list with one entry per example')
    return _rows(payload['instances'], model), False
  return _columns(payload['inputs'], model), True


# ----------------------------------------------------------------------------- KServe v2

V2_DATATYPES = {'float32': 'FP32', 'float16': 'FP16', 'bfloat16': 'BF16', 'int32': 'INT32',
                'int64': 'INT64', 'bool': 'BOOL'}


@functools.cache
def v2_datatype(dtype: np.dtype) -> str:
  return V2_DATATYPES.get(np.dtype(dtype).name, np.dtype(dtype).name.upper())


BINARY_HEADER = 'inference-header-content-length'  # The binary extension's JSON length.


@dataclasses.dataclass
class V2Request:
  """An infer request read: batched inputs, the outputs asked for (None: all), which of them
  come back as binary data, and the request's id."""
  inputs: dict[str, np.ndarray]
  outputs: list[str] | None
  binary_outputs: set[str]
  id: Any


def read_v2(body: bytes, header_length: str | None, model: ServedModel) -> V2Request:
  """An Open Inference Protocol (KServe v2) infer body: {"inputs": [{"name", "shape",
  "datatype", "data"}], "outputs"?}. With the binary tensor extension (the
  Inference-Header-Content-Length header) the JSON is the body's first bytes and each input
  that says {"parameters": {"binary_data_size": n}} takes its next n bytes after it: raw
  little-endian values, row-major, read in place of a JSON list of numbers."""
  binary = b''
  if header_length is not None:
    if not header_length.isdigit() or int(header_length) > len(body):
      raise RequestError(400, f'Inference-Header-Content-Length: {header_length!r} is not a '
                         f'length within the body of {len(body)} bytes')
    body, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
  payload = loads(body)
  if not isinstance(payload, dict):
    raise RequestError(400, 'body: expected a JSON object with "inputs"')
  unknown = set(payload) - {'id', 'inputs', 'outputs', 'parameters'}
  if unknown:
    raise RequestError(400, f"body: unknown field '{sorted(unknown)[0]}'")
  tensors = payload.get('inputs')
  if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
    raise RequestError(400, 'inputs: expected a list of {"name", "shape", "datatype", "data"}')
  arrays, count, offset = {}, None, 0
  for i, tensor in enumerate(tensors):
    field = f'inputs[{i}]'
    name = tensor.get('name')
    if name not in model.inputs:
      raise RequestError(400, f"{field}.name: {name!r} is not an input ({list(model.inputs)})")
    if name in arrays:
      raise RequestError(400, f"{field}.name: '{name}' given twice")
    example_shape, dtype = model.inputs[name]
    if tensor.get('datatype') != v2_datatype(dtype):
      raise RequestError(400, f"{field}.datatype: {tensor.get('datatype')!r} != "
                         f"'{v2_datatype(dtype)}'")
    shape = tensor.get('shape')
    if (not isinstance(shape, list) or not shape or
        not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
      raise RequestError(400, f'{field}.shape: expected a list of sizes, batch first')
    if tuple(shape[1:]) != example_shape:
      raise RequestError(400, f'{field}.shape: {shape} != [batch, '
                         f"{', '.join(map(str, example_shape))}]")
    _check_count(f'{field}.shape[0]', shape[0], model)
    if count is not None and shape[0] != count:
      raise RequestError(400, f'{field}.shape: batch {shape[0]}, but other inputs have {count}')
    count = shape[0]
    size = _parameters(f'{field}.parameters', tensor).get('binary_data_size')
    if size is None:
      value = tensor.get('data')
    else:
      value = _binary_tensor(f'{field}.parameters.binary_data_size', size, tensor, shape, dtype,
                             binary[offset:])
      offset += size
    arrays[name] = _array(f'{field}.data', value, tuple(shape), dtype, _vocab(model, name),
                          flat=True)
  missing = set(model.inputs) - set(arrays)
  if missing:
    raise RequestError(400, f"inputs: missing input '{sorted(missing)[0]}'")
  if offset != len(binary):
    raise RequestError(400, f'body: {len(binary) - offset} bytes after the JSON header that no '
                       "input's binary_data_size covers")
  all_binary = _parameters('parameters', payload).get('binary_data_output', False)
  requested = payload.get('outputs')
  if requested is None:
    return V2Request(arrays, None, set(model.outputs) if all_binary else set(),
                     payload.get('id'))
  if not isinstance(requested, list) or not all(
      isinstance(r, dict) and isinstance(r.get('name'), str) for r in requested):
    raise RequestError(400, 'outputs: expected a list of {"name": ...}')
  names, binary_outputs = [r['name'] for r in requested], set()
  for i, (name, r) in enumerate(zip(names, requested)):
    if name not in model.outputs:
      raise RequestError(400, f"outputs[{i}].name: {name!r} is not an output "
                         f'({list(model.outputs)})')
    if _parameters(f'outputs[{i}].parameters', r).get('binary_data', all_binary):
      binary_outputs.add(name)
  return V2Request(arrays, names, binary_outputs, payload.get('id'))


def _parameters(field: str, where: dict) -> dict:
  parameters = where.get('parameters', {})
  if not isinstance(parameters, dict):
    raise RequestError(400, f'{field}: expected an object')
  for key, kind in (('binary_data_size', int), ('binary_data', bool),
                    ('binary_data_output', bool)):
    value = parameters.get(key)
    if value is not None and (not isinstance(value, kind) or
                              (kind is int and (isinstance(value, bool) or value < 0))):
      raise RequestError(400, f'{field}.{key}: expected '
                         f"{'a byte count' if kind is int else 'true or false'}")
  return parameters


def _binary_tensor(field: str, size: int, tensor: dict, shape: list[int], dtype: np.dtype,
                   binary: memoryview) -> np.ndarray:
  """The values of one binary input: exactly the bytes its shape and dtype take."""
  if 'data' in tensor:
    raise RequestError(400, f'{field}: give "data" or binary data, not both')
  expected = math.prod(shape) * np.dtype(dtype).itemsize
  if size != expected:
    raise RequestError(400, f'{field}: {size} bytes, but shape {shape} of '
                       f'{v2_datatype(dtype)} takes {expected}')
  if size > len(binary):
    raise RequestError(400, f'{field}: {size} bytes, but only {len(binary)} follow the JSON')
  return np.frombuffer(binary[:size], np.dtype(dtype).newbyteorder('<')).reshape(shape)


def format_v2(model: ServedModel, outputs: dict[str, np.ndarray],
              request: V2Request) -> tuple[bytes, int | None]:
  """(body, JSON header length or None): the answer, with the outputs asked for as binary
  data after the JSON (the header length then goes in Inference-Header-Content-Length)."""
  answer, blobs = {'model_name': model.name, 'model_version': str(model.version),
                   'outputs': []}, []
  for name in outputs if request.outputs is None else dict.fromkeys(request.outputs):  # As asked.
    value = outputs[name]
    tensor = {'name': name, 'datatype': v2_datatype(value.dtype), 'shape': list(value.shape)}
    if name in request.binary_outputs:
      blobs.append(np.ascontiguousarray(value, value.dtype.newbyteorder('<')).tobytes())
      tensor['parameters'] = {'binary_data_size': len(blobs[-1])}
    else:
      tensor['data'] = value.reshape(-1).tolist()
    answer['outputs'].append(tensor)
  if isinstance(request.id, str):
    answer['id'] = request.id
  header = dumps(answer)
  return (header + b''.join(blobs), len(header)) if blobs else (header, None)


# ----------------------------------------------------------------------------- outputs

def _named(model: ServedModel, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
  """Outputs as JSON-ready lists, with class names where the data has them."""
  named = {name: value.tolist() for name, value in outputs.items()}
  if model.label_names and 'classes' in outputs and outputs['classes'].ndim == 1:
    named['labels'] = [model.label_names[c] for c in outputs['classes'].tolist()]
  if model.task == 'speech_ctc' and {'logits', 'frames'} <= set(outputs):
    named['transcripts'] = [ctc_greedy_text(logits, frames)
                            for logits, frames in zip(outputs['logits'], outputs['frames'])]
  return named


def ctc_greedy_text(logits: np.ndarray, frames: int) -> str:
  """Best class per valid frame, repeats merged, blanks (0) dropped: tasks/decoding's
  ctc_greedy for one utterance, as text."""
  best = np.argmax(logits[:int(frames)], -1)
  keep = (best != 0) & (best != np.concatenate([[-1], best[:-1]]))
  return audio.decode_ids(best[keep].tolist())


def format_outputs(model: ServedModel, outputs: dict[str, np.ndarray], columnar: bool) -> dict:
  """TF Serving's answer: {"outputs": ...} for columnar requests, {"predictions": [...]} for
  row requests; a bare value where there is one output."""
  named = _named(model, outputs)
  if columnar:
    return {'outputs': next(iter(named.values())) if len(named) == 1 else named}
  if len(named) == 1:
    return {'predictions': next(iter(named.values()))}
  n = len(next(iter(named.values())))
  return {'predictions': [{name: value[i] for name, value in named.items()} for i in range(n)]}


def finite(value: Any, field: str, low: float, high: float) -> float:
  """A number in [low, high] for a request field, or a RequestError naming it."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise RequestError(400, f'{field}: expected a number')
  if not low <= value <= high:
    raise RequestError(400, f'{field}: {value} is outside [{low}, {high}]')
  return value
