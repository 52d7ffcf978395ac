"""Messages -> token ids -> tokens: the tokenizer, the media processor and its cache, sampling, the generation
loop, prefix reuse across turns, and the continuous-batching scheduler. Imports models and below."""
