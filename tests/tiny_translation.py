"""A tiny native translation checkpoint with random weights and its own tokenizer, for
the translate / evaluate runner tests."""
from engine.train.checkpoint import save_checkpoint
from model import GLM, GLMConfig
from model.tokenizer import Tokenizer

TEXT = (["The file could not be opened.", "Permission denied", "Save changes?",
         "No such file or directory", "invalid option", "Cannot allocate memory",
         "无法打开文件。", "权限被拒绝", "保存更改吗？", "没有那个文件或目录", "无效的选项"] * 20)
SENTENCES = ["Permission denied", "The file could not be opened.", "Save changes?",
             "invalid option -- 'x'", "No such file or directory: a very long path name here"]


def make_checkpoint(root) -> str:
    tok = Tokenizer.train(TEXT, root / "tok", vocab_size=360)
    cfg = GLMConfig.preset("tiny", padded_vocab_size=384, init_std=0.3)
    model = GLM.build(cfg, seed=3)
    path = str(root / "ckpt")
    save_checkpoint(path, {n: p.detach() for n, p in model.named_parameters()}, {},
                    {"config": {"model": cfg.to_dict()}, "step": 7,
                     "tokenizer_sha256": tok.sha256},
                    extra_files={"tokenizer.model": str(tok.path)})
    return path
