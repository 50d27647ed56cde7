"""megatron_dispo.rewards: answer extraction and math verification (the paper's R(o, a) in {-1, +1}).

`verify_batch` is the only way rewards are computed. The sympy-heavy equivalence check lives in worker processes
(`pool.VerifierPool`), so importing this package does not import sympy or math-verify.
"""

from megatron_dispo.rewards.extract import ANSWER_FORMATS, AnswerFormat, extract_answer, last_boxed, reference_answer
from megatron_dispo.rewards.normalize import normalize_answer, strings_match
from megatron_dispo.rewards.pool import VerifierPool, get_default_pool
from megatron_dispo.rewards.verify import OUTCOMES, Outcome, OutcomeCounts, VerifyResult, verify_batch

__all__ = [
    "ANSWER_FORMATS",
    "OUTCOMES",
    "AnswerFormat",
    "Outcome",
    "OutcomeCounts",
    "VerifierPool",
    "VerifyResult",
    "extract_answer",
    "get_default_pool",
    "last_boxed",
    "normalize_answer",
    "reference_answer",
    "strings_match",
    "verify_batch",
]
