"""A teacher behind a server: ``lightning-distill serve`` (:mod:`~lightning_distill.serve.command`, on LitServe)
and what its clients and it share.

:mod:`~lightning_distill.serve.wire` (the compact binary answer of ``/v1/distill``, laid out as a label store's
records), :mod:`~lightning_distill.serve.openai` (the vLLM-compatible ``/v1/completions`` subset),
:mod:`~lightning_distill.serve.client` (:class:`TeacherClient`: one or several servers, retries, checks);
:mod:`~lightning_distill.serve.endpoints` and :mod:`~lightning_distill.serve.teacher` are the server (they import
LitServe, an optional dependency: ``pip install 'lightning-distill[serve]'``). The training side is
:class:`lightning_distill.signals.ServedTeacher`.
"""
