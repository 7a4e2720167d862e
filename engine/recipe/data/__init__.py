"""Data: zh_CN gettext catalogues -> EN/ZH pairs -> token shards -> deterministic batches.

    catalogs   find and parse .mo files, clean pairs
    corpus     train/dev/test split (whole catalogues held out), pairs TSV
    documents  pretraining documents from tokenized pairs
    shards     packed token arrays on disk (memmap + offsets + header)
    datasets   PretrainDataset (GLM / causal), TranslationDataset: get_batch(index, bs)
    prepare    the whole pipeline behind runners/prepare_data.py
"""
from engine.recipe.data.catalogs import Catalog, Pair, clean_pair, extract_pairs, find_catalogs, parse_mo
from engine.recipe.data.corpus import SplitConfig, Splits, load_corpus, read_tsv, split_pairs, write_tsv
from engine.recipe.data.datasets import PretrainDataset, TranslationDataset
from engine.recipe.data.shards import Shard, write_shard

__all__ = ["Catalog", "Pair", "PretrainDataset", "Shard", "SplitConfig", "Splits",
           "TranslationDataset", "clean_pair", "extract_pairs", "find_catalogs", "load_corpus",
           "parse_mo", "read_tsv", "split_pairs", "write_shard", "write_tsv"]
