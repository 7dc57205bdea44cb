import streamlit as st
st.title("spectra")
st.info("coming soon")
