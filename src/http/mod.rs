pub mod multipart;
