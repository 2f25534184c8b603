"""The s1K curation pipeline, ``s1fast data``: question pools -> decontaminated, deduplicated questions
(:mod:`~s1fast.data.collect`) -> teacher traces (``distill``) and student attempts (``attempt``) from OpenAI-compatible
servers (:mod:`s1fast.client`) or the local engine (:mod:`~s1fast.data.backends`) -> domains with the MSC 2020 rubric
(:mod:`~s1fast.data.classify`) -> s1's quality / difficulty / diversity selection (:mod:`~s1fast.data.select`) ->
s1K-schema training data that ``s1fast train --data`` reads. Records are keyed by a question hash and appended one
at a time (:mod:`~s1fast.data.store`), so every stage resumes where it stopped. The command: :mod:`~s1fast.data.cli`.
"""
