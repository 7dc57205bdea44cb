import streamlit as st
st.title("compress")
st.info("coming soon")
