"""Training of the two networks (VSI-SR meta-learning and fine-tuning, RL-DFN self-supervised fusion).

Nothing here is imported by the runtime path: reconstruction only needs :mod:`engines.vsisr` and
:mod:`engines.rldfn` plus a weights file. Modules are imported explicitly by the ``rllsm prepare-data``,
``finetune``, ``train-meta`` and ``train-fusion`` commands and by the tests.
"""
