"""``mergelab merge``: checkpoint folders of any model in, one merged checkpoint out."""
