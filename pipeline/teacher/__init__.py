"""Stages zero and one, teacher -> cache: fine-tuning a teacher (finetune), running it over task rows
(extract) or an unlabeled corpus (corpus), and the teacher pass both share (teacher_pass). It imports pipeline.core
and pipeline.cache only, never pipeline.negatives or pipeline.student."""
