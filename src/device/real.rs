pub struct RealXen;
