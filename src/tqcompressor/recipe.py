"""The defaults of `tqc run`: the recipe the measurements on 2 CPU cores support (see the README's
"Choosing the main job's recipe" and bench/results/recipe-*.json). A light module: the CLI reads it
before importing torch."""

METHOD = "auto"
AUTO_METHODS = ("svd",)  # the structures auto chooses among by default (keeping a layer dense always)
STAGES = 2
STEPS = 30  # optimizer steps per stage
LR = 3e-4  # peak learning rate
TEACHER_FRACTION = 0.0  # of the distillation and calibration blocks, sampled from the teacher
