"""The paper's experiments (Tables 4-5, Figures 3-5) regenerated at small scale on CPU.

    budget.py           ReportConfig: the sizes and step counts of a quick / full run
    stages.py           one recipe stage = a runner (in-process, or torchrun for pp > 1)
    quality.py          translation quality, size and latency of one checkpoint
    schedule_timing.py  Figure 3: time per epoch against batch size, per schedule (gloo)
    recipe.py           the runs in order, collected into one results dict
    write.py            results -> reports/*.md and (matplotlib present) PNG plots

Every number in a report is read back from the runs it made; nothing is typed in.
"""
