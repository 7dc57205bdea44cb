"""Instruction data: where examples come from, how they are split, how they become token batches.

- ``sources``: ``Example(system, user, answer)`` and the streamed, deduplicated sources behind
  ``iter_examples(source)`` (ShareGPT ``default``, ``chatterbot``, OpenOrca-column files and hub ids);
- ``split``: the honest calib / val / eval split by content hash (``example_side``, ``iter_side``,
  ``make_split`` -> ``Split`` with its ``SplitInfo`` fingerprints), the positional fit / held-out
  ``split_examples``, and ``calibration_id``, the name that Gram and spectrum caches key on;
- ``template``: chat templates probed in a child process under a time / memory / output budget
  (``check_chat_template``, ``ChatTemplateError``); ``records``: local JSON / JSON-lines files read record by
  record (UTF-8 checked first, fields typed, refusals naming file and line);
- ``encoding``: chat rendering with answer-only labels (``encode_example`` -> ``Encoded``) and right-padded
  [B, T] LongTensor batches (``iter_batches`` for evaluation, ``calibration_batches`` for calibration).

``template`` and ``records`` import nothing of the package; ``sources`` imports ``records`` (and the
package's ``paths``); ``split`` and ``encoding`` import ``sources`` (and ``encoding`` ``template``).
Every public name is re-exported here: ``from lowrank_core.data import make_split`` works.
"""
from __future__ import annotations

from .encoding import (IGNORE_INDEX, Encoded, answer_ids, batch_tokens, calibration_batches, clipped_example, collate,
                       encode_example, end_of_turn_id, iter_batches, iter_encoded_batches, pad_id,
                       prompt_messages, token_groups)
from .sources import (ALLOWED_SOURCES, ASSISTANT_ROLES, CHATTERBOT_PACKAGE, DATA_SOURCES, HUMAN_ROLES,
                      LOCAL_SUFFIXES, ORCA_COLUMNS, SHAREGPT_FILE, SHAREGPT_PACKAGE, DataSourceError, Example,
                      describe_dropped, examples_of, iter_chatterbot, iter_examples, iter_json_records, iter_orca,
                      iter_orca_records, iter_sharegpt, make_example, package_dir, sharegpt_path, source_name)
from .template import ChatTemplateError, check_chat_template
from .split import (SIDES, Split, SplitInfo, calibration_id, example_side, iter_side, keys_fingerprint,
                    make_split, split_examples)

__all__ = [
    # sources
    "ALLOWED_SOURCES", "ASSISTANT_ROLES", "CHATTERBOT_PACKAGE", "DATA_SOURCES", "HUMAN_ROLES", "LOCAL_SUFFIXES",
    "ORCA_COLUMNS", "SHAREGPT_FILE", "SHAREGPT_PACKAGE", "DataSourceError", "Example", "describe_dropped",
    "examples_of", "iter_chatterbot", "iter_examples", "iter_json_records", "iter_orca", "iter_orca_records", "iter_sharegpt",
    "make_example", "package_dir", "sharegpt_path", "source_name",
    # split
    "SIDES", "Split", "SplitInfo", "calibration_id", "example_side", "iter_side", "keys_fingerprint",
    "make_split", "split_examples",
    # template
    "ChatTemplateError", "check_chat_template",
    # encoding
    "IGNORE_INDEX", "Encoded", "answer_ids", "batch_tokens", "calibration_batches", "clipped_example", "collate", "encode_example",
    "end_of_turn_id", "iter_batches", "iter_encoded_batches", "pad_id", "prompt_messages", "token_groups",
]
