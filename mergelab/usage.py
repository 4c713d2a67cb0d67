"""The text of ``mergelab --help``, in a module of its own so that the console script
prints it without importing Lightning (seconds on a small machine)."""

COMMANDS = ("fit", "validate", "test", "embedded", "sweep", "merge", "compress", "retrieve")

USAGE = """mergelab: merge fine-tuned CLIP image encoders and score every result on every task;
merge any model's checkpoints into one, or keep them as one TALL store.

    mergelab test -c configs/vit_b32/base.yaml -c configs/methods/task_arithmetic.yaml
    mergelab test -c configs/vit_b32/base.yaml -c configs/methods/ties.yaml
    mergelab validate -c configs/vit_b32/base.yaml -c configs/methods/trust_region.yaml \\
        --merge.method.scaling_factor=0.4
    mergelab fit --config configs/finetune/mnist.yaml
    mergelab fit --config configs/vit_b32/trust_region_gradients.yaml
    mergelab test -c configs/vit_b32/base.yaml -c configs/methods/trust_region.yaml \\
        --merge.method.gradient_stats=<folder>
    mergelab test --help          (every option of a subcommand)
    mergelab test --merge.method.help TallMasks   (the settings of one merge method)
    mergelab fit --model.help GradientStatistics  (the options of a fit model)
    mergelab embedded             (every method on the embedded miniature benchmark)
    mergelab sweep configs/sweeps/task_arithmetic.yaml   (a W&B sweep file, run locally)
    mergelab merge configs/merge/qwen2.5_1.5b_task_arithmetic.yaml   (any model's checkpoints
        into one, in the base's layout; a mergekit YAML works too)
    mergelab compress configs/merge/qwen2.5_1.5b_tall_store.yaml   (a TALL store: τMTL and
        one 1-bit mask per task)
    mergelab retrieve <store> <task> --output <folder>   (one task's model from the store)

--merge.method  the merge method, by class (test, validate; TrustRegion for fit's
                GradientStatistics): ZeroShot, Finetuned, TaskArithmetic, TrustRegion,
                TallMasks, Consensus, Ties, Dare, TaskSingularVectors, Isotropic from
                mergelab.methods, or your own MergeMethod subclass by class path; its
                settings as --merge.method.<setting>. configs/<suite>/base.yaml holds a
                suite's model, tasks, data and trainer, configs/methods/<method>.yaml a
                method: give both, base first
--model.*  the CLIP model and fine-tuned encoders (test, validate); for fit, a model
           class (class_path) and its init_args: mergelab.lightning.finetune.FineTuner
           fine-tunes one task's encoder, mergelab.lightning.gradient_stats.
           GradientStatistics computes TATR's gradient statistics and merges when fit ends
--data.*   the tasks, batch size, splits, local dataset mirrors
--verbose  Lightning's banners, mergelab's per-run notes and the known harmless warnings
           (otherwise the console shows the progress bar, the results and warnings)

Each run writes to lightning_logs/<method>/version_N (lightning_logs/finetune/... or
lightning_logs/gradient_stats/... for fit): metrics.csv, results.json, results.md,
accuracy.png, the merge artifact or the fine-tuned encoder, and a W&B run (offline unless
you are logged in; WANDB_MODE=disabled turns it off). COMPLETE is written last; until
then the folder holds RUNNING, and a run that stopped holds FAILED or INTERRUPTED.
"""
