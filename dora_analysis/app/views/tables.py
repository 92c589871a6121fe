"""Tables: correlations and the per-matrix table, with downloads (CSV, HTML report)."""


import streamlit as st

import dora_analysis as da
from dora_analysis.app import cache
from dora_analysis.report import html_report, warning_lines

table = cache.current_table()
if table is None:
    st.info("No data yet: open the **Data** page first.")
    st.stop()

correlations = da.correlate(table)
for line in warning_lines(table):
    st.warning(line)
st.header("Correlation of ΔD and ΔM per checkpoint series and module kind")
st.dataframe(correlations, hide_index=True, use_container_width=True,
             column_config=cache.number_formats())
st.header("Per-matrix table")
st.dataframe(table, hide_index=True, use_container_width=True,
             column_config=cache.number_formats())

cols = st.columns(3)
cols[0].download_button("Download the table (CSV)", table.to_csv(index=False),
                        file_name="dora-analysis-table.csv", mime="text/csv")
cols[1].download_button("Download the correlations (CSV)", correlations.to_csv(index=False),
                        file_name="dora-analysis-correlations.csv", mime="text/csv")
cols[2].download_button("Download the HTML report", html_report(table, correlations),
                        file_name="dora-analysis-report.html", mime="text/html")
