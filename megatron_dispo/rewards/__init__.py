"""megatron_dispo.rewards: answer extraction and math verification (the paper's R(o, a) in {-1, +1}).

`verify_batch` is the only way rewards are computed. The sympy-heavy equivalence check lives in worker processes
(`pool.VerifierPool`), so importing this package does not import sympy or math-verify.
"""

from megatron_dispo.rewards.config import RewardConfig
from megatron_dispo.rewards.extract import ANSWER_FORMATS, AnswerFormat, extract_answer, last_boxed, reference_answer
from megatron_dispo.rewards.normalize import normalize_answer, strings_match
from megatron_dispo.rewards.outcomes import FailureScreen, outcome_fractions, screen_verifier_failures
from megatron_dispo.rewards.pool import VerifierPool, get_default_pool
from megatron_dispo.rewards.verify import (
    OUTCOMES,
    VERIFIER_FAILURES,
    Outcome,
    OutcomeCounts,
    VerifyResult,
    verify_batch,
)

__all__ = [
    "ANSWER_FORMATS",
    "OUTCOMES",
    "VERIFIER_FAILURES",
    "AnswerFormat",
    "FailureScreen",
    "Outcome",
    "OutcomeCounts",
    "RewardConfig",
    "VerifierPool",
    "VerifyResult",
    "extract_answer",
    "get_default_pool",
    "last_boxed",
    "normalize_answer",
    "outcome_fractions",
    "reference_answer",
    "screen_verifier_failures",
    "strings_match",
    "verify_batch",
]
