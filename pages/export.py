import streamlit as st
st.title("export")
st.info("coming soon")
