"""The defaults of `tqc run`: the recipe the measurements on 2 CPU cores support.

Chosen by `bench/recipe.py` (bench/results/recipe/recipe.json; "Choosing the main job's recipe" in the
README of commit f85860f): at the same 40 optimizer steps, one stage ended below two (the second stage's layers get
half the steps, and its recalibration costs time), a peak learning rate of 3e-4 below 1e-3, and
half the calibration and distillation blocks sampled from the teacher kept the student far closer
to the teacher on text the distillation never saw (KL 1.17 vs 2.03 nats/token) at 1.07 vs 1.04 on
WikiText-2 test. STEPS is what fits `make demo` into 25 minutes on 2 cores. Training runs in bf16
autocast on a CPU with native bf16 (bench/results/recipe/recipe-precision.json: 1.66x the tokens per
second of fp32, the same perplexity and KL to 0.003 at 40 steps), so it rose from 100 (fp32) to
240 and 280 steps with a pool of 64 teacher samples (bench/results/demo-240-steps.json and
demo-280-steps-pool-64.json of commit e091dba).
The student had memorised those 64 (perplexity 2.60 on them against the teacher's 8.64,
teacher-pool-64.json), so TEACHER_POOL is 128, which costs about 70 s of sampling, and STEPS is
260: on held-out teacher samples KL 0.95 instead of 1.03, WikiText-2 test 37.96 (1.28x the
teacher), 1,325 s inside tqc run (bench/results/demo-260-steps-scalar-weights.json of commit 2c8c0e2). Weighting each
layer's outputs by the loss's gradient energy (OUTPUT_WEIGHTS) then halved the one-shot perplexity
(208.8 -> 99.4) and the same 260 steps ended at 36.33 (1.23x) and KL 0.86 in 1,343 s. Since the
fidelity suite the recipe is chosen by fidelity KL on held-out text: the loss is the KL term at
temperature 1, without the CE term (TEMPERATURE, ALPHA_CE). STEPS is the default of a run without
--time-budget; make demo fixes its steps by the budget.
"""

from tqcompressor.planning.formats import FORMATS, LOW_BIT_FORMATS

METHOD = "auto"
AUTO_METHODS = ("svd",)  # the structures auto chooses among by default (keeping a layer dense always)
STAGES = 1
STEPS = 260  # optimizer steps per stage (4 blocks of 256 tokens each)
LR = 3e-4  # peak learning rate
TEACHER_FRACTION = 0.5  # of the distillation and calibration blocks, sampled from the teacher
# the loss, chosen by fidelity KL on held-out text (bench/results/recipe/recipe-fidelity.json, 60 steps each,
# one run): the KL term alone at the temperature fidelity is scored at (1) ended at fidelity KL 1.591, against
# 1.669 with DistilBERT's T = 2 and CE weight 2 (the earlier recipe) and 1.710 with T = 2 and no CE; every
# held-out domain improved
TEMPERATURE = 1.0  # of the KL term
ALPHA_CE = 0.0  # weight of cross-entropy on the data's next tokens (alpha_kl stays 5)
# the KL term forward, on given text: at the same 60 steps, half of it in reverse ended at fidelity KL 1.630, all of
# it at 1.835, and a quarter of the steps on the student's own samples at 1.656, against 1.591 (the sampling also
# cut the tokens per second to a third; bench/results/recipe/recipe-divergence.json)
REVERSE_KL = 0.0  # share of the KL term taken in reverse, KL(student || teacher)
ON_POLICY = 0.0  # share of steps on the student's own samples, scored by the teacher
ALPHA_BLOCKS = 0.0  # weight of block matching (losses.block_matching_loss)
TEACHER_POOL = 128  # teacher blocks sampled once and cycled (sampling costs about a quarter of a KD step per block)
# how often a time-budgeted run may show distillation each teacher sample before its pool grows: STEPS with
# TEACHER_POOL show each about 4 times (260 steps x 2 teacher blocks / 128); 9 times (a pool of 64) was memorised
TEACHER_VIEWS = 4
# where each teacher sample begins (data.TEACHER_STARTS): the start token. Begun from a random token, as
# LLM-QAT does, the samples hold more kinds of text, yet the student ended further from the teacher on every
# held-out domain, code and docs included: fidelity KL 1.700 against 1.591 after 60 steps
# (bench/results/recipe/recipe-teacher-start.json)
TEACHER_START = "bos"
# refit block by block before distilling: off. It lowers one-shot perplexity (127.0 -> 111.0 on WikiText-2
# test, bench/results/sequential/sequential-ridge.json; in make demo 208.8 -> 132.8) but the distilled student ended
# worse: 64.2 (KL 1.28) after 80 steps, against 47.28 (KL 0.94) after 100 without it
# (both fp32: bench/results/demo-sequential.json of commit 4c93b32, and docs/demo-results.json of 0dec7e0)
SEQUENTIAL = False
# block-wise reconstruction before distilling (training/blockwise.py: each block fitted to the teacher's by a few
# Adam steps, first to last): 40 steps a block at lr 5e-4. In make demo's 25 minutes (commit 51aeef5, 2 CPU cores,
# auto's student at one-shot fidelity KL 2.431) it ended at 1.643 against 1.691 without it: 2.7 min of refits and
# 50 KD steps against 98 KD steps (docs/demo-ratio-results.json, docs/demo-results-no-blockwise.json). From
# bench/recovery.py's svd_aware student (one-shot 5.228), each given the same minutes, it ended at 3.293 against
# 3.582 for global KD alone (recovery-steps40-lr5e-4.json); 25 steps at lr 1e-4 barely moved each block and ended
# at 3.482 against 3.401 (recovery.json)
BLOCKWISE_STEPS = 40  # Adam steps per decoder block (0: off)
BLOCKWISE_LR = 5e-4
# weigh each layer's outputs by the loss's gradient energy in auto's budget and fits (Fisher rows): at the same
# 40 steps it started from 99.4 instead of 208.8 and ended at 49.88 instead of 57.41 on WikiText-2 test, KL 1.044
# instead of 1.177 on held-out teacher samples (bench/results/recipe/recipe-output-weights.json)
OUTPUT_WEIGHTS = True

# tqc run --max-bytes: the structures a matrix may be stored as beside the formats: none. With int3 and int2 on
# the menu the formats reach 55 MiB of SmolLM2-135M, and wherever they reach a budget SVD factors planned beside
# them ended further from the teacher (bench/results/frontier/frontier-low-bit.json, one-shot: 60 MiB 0.690
# formats alone, 1.119 with SVD; 65 MiB 0.331 against 0.561): the output-error proxy prices a rank's truncation
# below what the held-out KL finds. `--structures svd` reaches budgets below the formats' smallest model
BYTE_STRUCTURES: tuple[str, ...] = ()
# nor a low-bit format plus a low-rank correction of its rounding error (planning/corrections.py): measured
# one-shot (bench/results/frontier/frontier-corrections.json) it ended closer only at 55 MiB (1.839 against 2.029)
# and further at 60 MiB (0.805 against 0.689), 65 MiB and 71.5 MiB, and its menus took 161 s to measure
BYTE_CORRECTION_RANKS: tuple[int, ...] = ()
# and the formats of its whole matrices: round-to-nearest only, int4 and int8 and below 4 bits. HQQ's six int4
# formats took 125 of the 194 s measuring SmolLM2-135M's menus on 2 CPU cores (65 s for the token table alone),
# minutes a 25-minute run spends distilling instead; tqc quantize --max-bytes keeps them (no distillation follows
# there); the same holds for HQQ's int3 and int2 formats
BYTE_FORMATS = LOW_BIT_FORMATS + FORMATS
# and while it distils, its stored matrices learn their scales and offsets, the integers kept (EfficientQAT's
# end-to-end step); frozen, only the factors and norms trained
LEARN_GRIDS = True
