import streamlit as st
st.title("evaluate")
st.info("coming soon")
