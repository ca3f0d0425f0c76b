"""Constants the ops share. The kernels read the ``tl.constexpr`` copies (a jitted function may only read
module globals that are constexpr); launchers multiply scales by the plain floats."""
import math

import triton.language as tl

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# base-2 exponentials: exp(x) = exp2(x * LOG2E), and a base-2 log-sum-exp times LN2 is a natural one
K_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
K_LN2: tl.constexpr = tl.constexpr(LN2)
