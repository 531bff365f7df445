"""The stages, in topological order: tokenizer -> prepare -> train -> evaluate, decode."""

from pipeline.stages import decode, evaluate, prepare, tokenizer, train

STAGES = [tokenizer.STAGE, prepare.STAGE, train.STAGE, evaluate.STAGE, decode.STAGE]

