"""The workflows as library functions, each `run(config, ...) -> checkpoint path`
(evaluate: -> its result), and `main(argv)`, the command line of the runner of the same
name (engine/config_cli.py):

    pretrain   train a GLM (pretraining or translation fine-tuning)
    prune      a trained checkpoint -> a smaller student checkpoint
    distill    train a student against a frozen teacher
    finetune   mixed-language fine-tuning of a teacher; continued distillation of a student
    evaluate   translation quality, loss, size and speed of a checkpoint

Training workflows share one lifecycle (engine/train/lifecycle.py)."""
