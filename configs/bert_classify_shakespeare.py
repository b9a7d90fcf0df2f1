"""Who is speaking? The character BERT of bert_mlm_shakespeare fine-tuned to name the
speaker of a tiny Shakespeare speech, one of the 8 who speak most.

Same model size, tokenizer and seq_len as the masked-LM config, so its checkpoint loads:
  python train.py --config=configs/bert_mlm_shakespeare.py --workdir=runs/bert_mlm
  python train.py --config=configs/bert_classify_shakespeare.py --workdir=runs/bert_speakers \
      --config.init.checkpoint_dir=runs/bert_mlm
"""


from configs import bert_mlm_shakespeare


def get_config():
  c = bert_mlm_shakespeare.get_config()
  c.task = 'sequence_classification'
  c.dataset.num_speakers = 8  # Speakers to tell apart: the most frequent ones; others dropped.
  c.dataset.holdout_fraction = 0.2  # Each speaker's last 20% of speeches (in text order) is eval.
  c.dataset.pretrain_holdout_fraction = 0.1  # The masked-LM run's holdout_fraction (same tokenizer)
  c.dataset.seq_len = 128  # Tokens per speech, [CLS] included; longer speeches are cut.
  c.dataset.shuffle_buffer = 16_384  # More than the training speeches: a full shuffle.

  c.model.num_classes = 0  # Classifier outputs; 0 takes them from the data (num_speakers).
  # Mean over the speech, not [CLS]: masked-LM pre-training never trains the [CLS] position.
  c.model.pooling = 'mean'

  c.init.checkpoint_dir = ''  # Point at a bert_mlm_shakespeare run's workdir to fine-tune it.
  # LoRA (--config.lora.rank=8 --config.optimizer.learning_rate=3e-3): adapters on the fused
  # attention projection only, as Hu et al. adapt attention weights (with fc1/fc2/out too, rank
  # 8 would train ~5% of this small BERT); the LayerNorms train too (0.3% of the weights). The
  # adapters start at B = 0 and need ~10x full fine-tuning's rate: at 3e-4 the loss barely
  # moved in 400 steps (17.9% accuracy against 26.1% for full fine-tuning; 26.5% at 3e-3).
  c.lora.targets = r'attn/qkv'
  c.lora.trainable = r'classifier|ln1|ln2|ln_f'  # The new head and the LayerNorms train beside the adapters.

  c.batch_size = 32
  c.eval_batch_size = 128
  c.num_train_steps = 400
  c.optimizer.learning_rate = 3e-4  # Fine-tuning: a third of the pre-training peak.
  c.schedule.warmup_steps = 40
  c.schedule.end_learning_rate_fraction = 0.0
  c.early_stopping.metric = 'accuracy'
  c.early_stopping.mode = 'max'
  c.log_every_steps = 20
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 200
  return c
