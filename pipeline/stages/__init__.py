"""The stages, in topological order: tokenizer -> prepare -> train -> (index) -> evaluate, decode.

`index` is optional (an `index:` section enables it); it needs the tokenizer, and `train` when it embeds."""

from pipeline.stages import decode, evaluate, index, prepare, tokenizer, train

STAGES = [tokenizer.STAGE, prepare.STAGE, train.STAGE, index.STAGE, evaluate.STAGE, decode.STAGE]

