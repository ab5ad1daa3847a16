"""Compiler passes. Importing this package registers every pass with the manager."""

from circuitir.passes import ablate, circuit_passes, prune  # noqa: F401  (registration)
from circuitir.passes.manager import (REGISTRY, PassCall, PipelineState, parse_pipeline,  # noqa: F401
                                      pipeline_text, run_pipeline)

DEFAULT_PIPELINE = "trace, mean-ablate{over=pretrain,tokens=65536}, prune{target=0.15}, lower, fold-constants, dce"
