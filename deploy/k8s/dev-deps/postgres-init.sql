-- One database per CLM service (each service owns its data).
CREATE DATABASE clm_customer;
CREATE DATABASE clm_scoring;
CREATE DATABASE clm_segmentation;
CREATE DATABASE clm_feedback;
CREATE DATABASE clm_loyalty;
