"""Step 2 (notebook 02): captions of every mask with an open_clip CoCa.

Decoding core (``decoding``, ``processors``, ``noise``): a KV-cached decoding loop over any open_clip
CoCa, logits processors, beam search, distinctive caption sampling, keyed sampling noise. Entry point
for the pipeline step: :func:`generate_candidates` (the paper's candidate set for the masks of one image).
"""

from .decoding import (
    CocaDecoder,
    DecodeSetting,
    TokenIds,
    beam_search,
    generate_candidates,
    parse_settings,
    sample_captions,
    similarity_weights,
    strip_special,
)
from .noise import keyed_uniform, row_key, sample_inverse_cdf
from .processors import (
    DistinctiveContrast,
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    SamplingSetProcessor,
    TemperatureLogitsProcessor,
    TopKLogitsProcessor,
    TopPLogitsProcessor,
)

__all__ = [
    "CocaDecoder",
    "DecodeSetting",
    "TokenIds",
    "beam_search",
    "generate_candidates",
    "parse_settings",
    "sample_captions",
    "similarity_weights",
    "strip_special",
    "keyed_uniform",
    "row_key",
    "sample_inverse_cdf",
    "DistinctiveContrast",
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinLengthLogitsProcessor",
    "SamplingSetProcessor",
    "TemperatureLogitsProcessor",
    "TopKLogitsProcessor",
    "TopPLogitsProcessor",
]
