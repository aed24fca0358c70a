"""Building blocks of the model: linear (bf16/fp32, FP8 in fp8_linear), paged attention, rotary, norm, sampler."""
