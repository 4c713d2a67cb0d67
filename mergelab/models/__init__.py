"""The models: open_clip loading and checkpoint conversion (``clip``, ``hf_clip``), zero-shot
heads (``heads``), the logits formula (``logits``) and per-sample |gradient| sums
(``per_sample_gradients``)."""
