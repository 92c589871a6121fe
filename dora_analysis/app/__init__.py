"""The Streamlit dashboard, served by the ``dora-dashboard`` command (:mod:`.serve`).

Only that command imports this subpackage's pages and helpers; the library never imports it, nor
streamlit (``pip install 'dora-analysis[app]'`` adds streamlit).
"""
