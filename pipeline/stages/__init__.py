"""The stages, in topological order: tokenizer -> prepare -> train -> evaluate, tasks (optional), decode."""

from pipeline.stages import decode, evaluate, prepare, tasks, tokenizer, train

STAGES = [tokenizer.STAGE, prepare.STAGE, train.STAGE, evaluate.STAGE, tasks.STAGE, decode.STAGE]
